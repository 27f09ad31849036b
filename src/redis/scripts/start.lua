-- A worker starts a task it took from the stream (new, or taken over from
-- a worker that went silent): counts the attempt, `running`. A task that
-- is not to run is acknowledged here: one cancelled, finished or gone, or
-- one whose attempts are spent (it ends failed, without its payload, in
-- the dead letters, out of the user's pending set). (The caller tells the
-- user.)
-- KEYS[1] the record, KEYS[2] the user's pending set, KEYS[3] the queue
-- stream, KEYS[4] the dead letters stream
-- ARGV[1] now (ms), ARGV[2] max attempts, ARGV[3] the stream entry id,
-- ARGV[4] task id, ARGV[5] dead letters kept (approximately), ARGV[6] the
-- error of a task lost by its worker
-- Returns the attempt number when started; 0 when it is not to run; -2
-- when its attempts are spent (failed now), with the error.
local rec = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'error', 'name', 'user', 'payload')
local status = rec[1]
if status ~= 'queued' and status ~= 'running' then
  redis.call('XACK', KEYS[3], 'workers', ARGV[3])
  return {0}
end
local attempts = tonumber(rec[2] or '0')
if attempts >= tonumber(ARGV[2]) then
  local err = rec[3] or ARGV[6]
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'updated_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'payload')
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('XACK', KEYS[3], 'workers', ARGV[3])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'task_id', ARGV[4],
    'name', rec[4], 'user', rec[5], 'payload', rec[6] or 'null', 'error', err,
    'attempts', attempts)
  return {-2, err}
end
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'updated_at', ARGV[1])
return {attempts}
