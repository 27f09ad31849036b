-- Removes a connection from the registry, the per-user counts, its
-- instance's set and the presence of every room it was still in
-- (announcing `left` where it was the user's last connection). Used on
-- disconnect, in reconciles and to reap the connections of a dead
-- instance; idempotent. Touches only the keys it is given: the caller reads
-- the connection's rooms first and passes their presence hashes; when the
-- room set holds a room not passed, nothing changes and -1 says "read again".
-- KEYS[1] connections hash, KEYS[2] user connection counts hash,
-- KEYS[3] the connection's room set, KEYS[4] its instance's connection set,
-- KEYS[5] the set of rooms with members, KEYS[5 + i] presence hash of room i
-- ARGV[1] connection id, ARGV[2 * i] room i, ARGV[2 * i + 1] its channel
local passed = {}
for i = 1, #KEYS - 5 do
  passed[ARGV[2 * i]] = i
end
local rooms = redis.call('SMEMBERS', KEYS[3])
for _, room in ipairs(rooms) do
  if not passed[room] then
    return -1
  end
end
redis.call('SREM', KEYS[4], ARGV[1])
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then
  redis.call('DEL', KEYS[3])
  return 0
end
local user = cjson.decode(entry)['user']
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
  redis.call('HDEL', KEYS[2], user)
end
for _, room in ipairs(rooms) do
  local i = passed[room]
  if redis.call('HINCRBY', KEYS[5 + i], user, -1) <= 0 then
    redis.call('HDEL', KEYS[5 + i], user)
    if redis.call('HLEN', KEYS[5 + i]) == 0 then
      redis.call('SREM', KEYS[5], room)
    end
    redis.call('PUBLISH', ARGV[2 * i + 1], cjson.encode({type = 'left', room = room, user = user}))
  end
end
redis.call('DEL', KEYS[3])
return 1
