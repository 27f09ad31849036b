-- A task ends, if the record still shows this worker's attempt (a worker
-- that lost its claim writes nothing): `done` with its result or `failed`
-- with its error (and a copy in the dead letters); the payload is dropped,
-- the record kept for its TTL, the entry acknowledged, the user's pending
-- entry removed. (The caller tells the user.)
-- KEYS[1] the record, KEYS[2] the user's pending set, KEYS[3] the queue
-- stream, KEYS[4] the dead letters stream
-- ARGV[1] the attempt, ARGV[2] `done` or `failed`, ARGV[3] the result (JSON)
-- or the error, ARGV[4] now (ms), ARGV[5] the record's TTL (ms), ARGV[6] the
-- stream entry id, ARGV[7] task id, ARGV[8] dead letters kept
-- (approximately)
-- Returns 1 when written, 0 when the claim was lost.
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'name', 'user', 'payload')
if rec[1] ~= 'running' or rec[2] ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'done' then
  redis.call('HSET', KEYS[1], 'status', 'done', 'result', ARGV[3], 'updated_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'error', 'payload')
else
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3], 'updated_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'payload')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'task_id', ARGV[7],
    'name', rec[3], 'user', rec[4], 'payload', rec[5] or 'null', 'error', ARGV[3],
    'attempts', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[7])
redis.call('XACK', KEYS[3], 'workers', ARGV[6])
return 1
