-- Undoes a submission whose enqueue failed, in one step: the record, the
-- pending entry, the idempotency key (if it still names this task).
-- KEYS[1] the record, KEYS[2] the user's pending set, KEYS[3] the
-- idempotency key (only when there is one)
-- ARGV[1] task id
-- Returns 1 when undone (or nothing was left), 0 when the task has started:
-- the enqueue did happen (its answer was lost), so it stays.
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'queued' then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return 1
