-- A backend reports progress of a running task. (The caller tells the
-- user: the user's channel is in another cluster slot.)
-- KEYS[1] the task's record
-- ARGV[1] progress (0-100), ARGV[2] now (ms)
-- Returns {1, user} when reported, {0} when the task is not running, {-1}
-- when unknown.
local rec = redis.call('HMGET', KEYS[1], 'status', 'user')
if not rec[1] then
  return {-1}
end
if rec[1] ~= 'running' then
  return {0}
end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'updated_at', ARGV[2])
return {1, rec[2]}
