-- Ends a connection's membership of a room; announces `left` on the room's
-- channel when it was its user's last connection there. Idempotent: a
-- connection that is not a member changes nothing.
-- KEYS[1] the room's members (connection -> user), KEYS[2] the room's
-- presence (user -> member connections), KEYS[3] the room's channel
-- ARGV[1] connection id, ARGV[2] the left frame's start, up to the user
-- (`{"type":"left","room":"r","user":`), ARGV[3] PUBLISH or SPUBLISH
-- Returns 1 when it was a member, 0 when it was not.
local user = redis.call('HGET', KEYS[1], ARGV[1])
if not user then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
  redis.call('HDEL', KEYS[2], user)
  redis.call(ARGV[3], KEYS[3], ARGV[2] .. cjson.encode(user) .. '}')
end
return 1
