-- Adds a connection to its user's connections unless the user already
-- holds the maximum (the check and the add are one step, so the limit
-- holds across every instance). Idempotent.
-- KEYS[1] the user's connections (connection -> registry entry JSON)
-- ARGV[1] connection id, ARGV[2] registry entry JSON, ARGV[3] max per user,
-- ARGV[4] "1" to restore a connection this instance holds (no limit check)
-- Returns 1 when registered, 0 when the user is at the limit.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if ARGV[4] ~= '1' and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
