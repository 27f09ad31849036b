-- Cancels a task that has not started: it ends failed, error `cancelled`.
-- KEYS[1] the task's record
-- ARGV[1] the user asking, ARGV[2] now (ms), ARGV[3] the user's channel,
-- ARGV[4] the failed frame
-- Returns 1 when cancelled, 0 when it has started or finished, -1 when
-- there is no such task of this user's.
if redis.call('HGET', KEYS[1], 'user') ~= ARGV[1] then
  return -1
end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', 'cancelled', 'updated_at', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
