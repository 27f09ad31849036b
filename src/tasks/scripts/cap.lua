-- Counts a task against its user's cap of tasks not yet finished.
-- KEYS[1] the user's set of pending task ids
-- ARGV[1] cap, ARGV[2] task id, ARGV[3] the set's TTL in ms
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
