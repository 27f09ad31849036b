-- Makes a connection a member of a room; announces `joined` on the room's
-- channel when it is its user's first connection there. Idempotent: a
-- member already recorded changes nothing, so a join done again (a retry,
-- a reconcile) never counts twice.
-- KEYS[1] the room's members (connection -> user), KEYS[2] the room's
-- presence (user -> member connections), KEYS[3] the room's channel
-- ARGV[1] connection id, ARGV[2] user, ARGV[3] the joined frame,
-- ARGV[4] PUBLISH or SPUBLISH
-- Returns 1 when it became a member, 0 when it was one.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
  redis.call(ARGV[4], KEYS[3], ARGV[3])
end
return 1
