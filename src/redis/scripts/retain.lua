-- Keeps a user's ended tasks' records within a byte budget: the record
-- just ended is counted, those past their TTL are forgotten, and the
-- oldest go first while the rest is over the budget (the newest always
-- stays). The caller deletes the records named in the answer.
-- KEYS[1] the user's kept records (sorted set: "<bytes>:<task id>" -> when
-- it ended, ms), KEYS[2] their bytes in all
-- ARGV[1] task id, ARGV[2] its record's bytes, ARGV[3] now (ms), ARGV[4]
-- the records' TTL (ms), ARGV[5] the budget (bytes)
-- Returns the ids of the records to delete.
local now = tonumber(ARGV[3])
local expired = now - tonumber(ARGV[4])
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', expired)) do
  total = total - tonumber(string.match(member, '^(%d+):'))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', expired)
redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[1])
total = total + tonumber(ARGV[2])
local evicted = {}
while total > tonumber(ARGV[5]) and redis.call('ZCARD', KEYS[1]) > 1 do
  local member = redis.call('ZPOPMIN', KEYS[1])[1]
  local bytes, id = string.match(member, '^(%d+):(.*)$')
  total = total - tonumber(bytes)
  evicted[#evicted + 1] = id
end
if total < 0 then
  total = 0
end
redis.call('SET', KEYS[2], total, 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return evicted
