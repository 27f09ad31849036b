-- Records that a connection is a member of a room; announces `joined` on the
-- room channel when it is the user's first connection in the room.
-- KEYS[1] presence hash (user -> connections), KEYS[2] the connection's room set,
-- KEYS[3] the set of rooms with members
-- ARGV[1] user, ARGV[2] room, ARGV[3] joined frame, ARGV[4] room channel
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then
  return 0
end
if redis.call('HINCRBY', KEYS[1], ARGV[1], 1) == 1 then
  redis.call('SADD', KEYS[3], ARGV[2])
  redis.call('PUBLISH', ARGV[4], ARGV[3])
end
return 1
