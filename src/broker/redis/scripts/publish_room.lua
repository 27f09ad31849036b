-- Appends a room message to the history stream and publishes it on the room
-- channel in one atomic step, so id order and delivery order agree.
-- KEYS[1] history stream, KEYS[2] room channel
-- ARGV[1] history.size (MAXLEN ~), ARGV[2] history.ttl in ms,
-- ARGV[3] room as a JSON string, ARGV[4] from as a JSON string, ARGV[5] data as JSON
local t = redis.call('TIME')
local ts = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local body = '"room":' .. ARGV[3] .. ',"from":' .. ARGV[4] .. ',"data":' .. ARGV[5] .. ',"ts":' .. ts .. '}'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'b', body)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], '{"id":"' .. id .. '",' .. body)
return id
