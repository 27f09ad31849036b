-- Hands a submitted task to the workers and makes its submission lasting.
-- KEYS[1] the record, KEYS[2] the queue stream, KEYS[3] the user's pending
-- set, KEYS[4] the idempotency key (only when there is one)
-- ARGV[1] task id, ARGV[2] the record's TTL (ms), ARGV[3] the idempotency
-- key's TTL (ms)
-- Returns 1 when enqueued, 0 when the task is no longer queued (cancelled
-- meanwhile, or gone).
local rec = redis.call('HMGET', KEYS[1], 'status', 'name', 'user', 'payload')
if rec[1] ~= 'queued' then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'task_id', ARGV[1], 'name', rec[2], 'user', rec[3],
  'payload', rec[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], 'XX', '+inf', ARGV[1])
if KEYS[4] and redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return 1
