-- Appends a room message to its history stream and publishes it on the
-- room's channel in one atomic step, so id order and delivery order agree.
-- With a publish key, a publish already made answers its first id and
-- changes nothing (a client's retry, or a command resent after a lost
-- connection, is not stored twice).
-- Every key and the channel carry the room's hash tag: one cluster slot.
-- KEYS[1] history stream, KEYS[2] room channel, KEYS[3] publish key (only
-- when there is one)
-- ARGV[1] history.size (MAXLEN ~), ARGV[2] history.ttl (ms), ARGV[3] room
-- as a JSON string, ARGV[4] from as a JSON string, ARGV[5] data as JSON,
-- ARGV[6] PUBLISH or SPUBLISH, ARGV[7] the publish key's TTL (ms)
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    return first
  end
end
local t = redis.call('TIME')
local ts = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local body = '"room":' .. ARGV[3] .. ',"from":' .. ARGV[4] .. ',"data":' .. ARGV[5] .. ',"ts":' .. ts .. '}'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'b', body)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[3] then
  redis.call('SET', KEYS[3], id, 'PX', ARGV[7])
end
redis.call(ARGV[6], KEYS[2], '{"id":"' .. id .. '",' .. body)
return id
