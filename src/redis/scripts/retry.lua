-- The next attempt of a running task begins, if the record still shows the
-- attempt that failed (a worker that lost its claim does nothing).
-- KEYS[1] the record
-- ARGV[1] the attempt that failed, ARGV[2] its error, ARGV[3] now (ms)
-- Returns the new attempt's number, 0 when the claim was lost.
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  return 0
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'error', ARGV[2], 'updated_at', ARGV[3])
return attempt
