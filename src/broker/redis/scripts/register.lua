-- Adds a connection to the registry unless its user already holds the
-- maximum number of connections cluster-wide (atomic check and add), and to
-- its instance's set (so reaping that instance costs what it held).
-- KEYS[1] connections hash, KEYS[2] user connection counts hash,
-- KEYS[3] the instance's connection set
-- ARGV[1] connection id, ARGV[2] user, ARGV[3] registry JSON, ARGV[4] max per user
-- ARGV[5] "1" to restore after an outage (no limit check; idempotent)
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3]) == 0 then
  redis.call('SADD', KEYS[3], ARGV[1])
  return 1
end
if ARGV[5] ~= '1' then
  local n = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
  if n >= tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return 0
  end
end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('SADD', KEYS[3], ARGV[1])
return 1
