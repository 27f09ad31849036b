-- Removes a connection from the registry, the per-user counts and the
-- presence of every room it was still in (announcing `left` where it was the
-- user's last connection). Used on disconnect and to reap the connections of
-- a dead instance; idempotent.
-- KEYS[1] connections hash, KEYS[2] user connection counts hash,
-- KEYS[3] the connection's room set
-- ARGV[1] connection id, ARGV[2] key prefix (for presence keys and channels)
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
for _, room in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local presence = ARGV[2] .. ':presence:' .. room
  if redis.call('HINCRBY', presence, user, -1) <= 0 then
    redis.call('HDEL', presence, user)
    redis.call('PUBLISH', ARGV[2] .. ':room:' .. room,
      cjson.encode({type = 'left', room = room, user = user}))
  end
end
redis.call('DEL', KEYS[3])
return 1
