-- Submits a task in one step: its idempotency key, the user's cap, its
-- record. Everything is provisional (expires after ARGV[7] ms) until
-- enqueue.lua hands the task to the workers, so a submission that never
-- got there undoes itself even when its own undo could not run.
-- KEYS[1] the record, KEYS[2] the user's pending set (task id -> the
-- deadline of a provisional entry, +inf once enqueued), KEYS[3] the
-- idempotency key (only when the client gave one)
-- ARGV[1] task id, ARGV[2] name, ARGV[3] user, ARGV[4] payload, ARGV[5] now
-- (ms), ARGV[6] the cap, ARGV[7] provisional TTL (ms), ARGV[8] the pending
-- set's TTL (ms)
-- Returns {1, id} when submitted, {0, id} when the idempotency key names an
-- earlier task, {-1, ''} when the user is at the cap.
local now = tonumber(ARGV[5])
if KEYS[3] then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then
    return {0, earlier}
  end
end
-- Entries whose submission never reached the workers.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then
  return {-1, ''}
end
redis.call('HSET', KEYS[1], 'task_id', ARGV[1], 'name', ARGV[2], 'user', ARGV[3],
  'status', 'queued', 'attempts', 0, 'created_at', ARGV[5], 'updated_at', ARGV[5],
  'payload', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[7])
end
return {1, ARGV[1]}
