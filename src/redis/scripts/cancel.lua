-- Cancels a task that has not started: it ends failed, error `cancelled`,
-- without its payload, and leaves the user's pending set. Its stream entry
-- stays; a worker that reads it finds the record failed and skips it. (The
-- caller tells the user: the user's channel is in another cluster slot.)
-- KEYS[1] the record, KEYS[2] the user's pending set
-- ARGV[1] the user asking, ARGV[2] now (ms), ARGV[3] task id
-- Returns 1 when cancelled, 0 when it has started or finished, -1 when
-- there is no such task of this user's.
if redis.call('HGET', KEYS[1], 'user') ~= ARGV[1] then
  return -1
end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', 'cancelled', 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'payload')
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
