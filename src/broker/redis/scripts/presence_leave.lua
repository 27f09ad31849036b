-- The reverse of presence_join: announces `left` when it was the user's last
-- connection in the room.
-- KEYS[1] presence hash, KEYS[2] the connection's room set,
-- KEYS[3] the set of rooms with members
-- ARGV[1] user, ARGV[2] room, ARGV[3] left frame, ARGV[4] room channel
if redis.call('SREM', KEYS[2], ARGV[2]) == 0 then
  return 0
end
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HLEN', KEYS[1]) == 0 then
    redis.call('SREM', KEYS[3], ARGV[2])
  end
  redis.call('PUBLISH', ARGV[4], ARGV[3])
end
return 1
