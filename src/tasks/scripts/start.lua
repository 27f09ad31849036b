-- A worker starts a task it took from the stream (new, or taken over from
-- a worker that went silent): counts the attempt and announces `running`.
-- KEYS[1] the task's record
-- ARGV[1] now (ms), ARGV[2] max attempts, ARGV[3] the user's channel,
-- ARGV[4] the running frame, ARGV[5] the failed frame (attempts exhausted)
-- Returns the attempt number; 0 when the task is finished or cancelled,
-- -1 when its record is gone, -2 when its attempts are exhausted (failed now).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return -1
end
if status == 'done' or status == 'failed' then
  return 0
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[2]) then
  local err = redis.call('HGET', KEYS[1], 'error') or 'worker lost'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'updated_at', ARGV[1])
  redis.call('PUBLISH', ARGV[3], ARGV[5])
  return -2
end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return attempts
