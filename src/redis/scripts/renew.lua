-- A running attempt keeps its claim: the entry's idle time starts again,
-- so no other worker's XAUTOCLAIM takes it while it runs, unless it is no
-- longer this consumer's (taken over after a long silence).
-- KEYS[1] the queue stream
-- ARGV[1] the consumer group, ARGV[2] the consumer, ARGV[3] the entry id
-- Returns 1 when renewed, 0 when the claim is lost.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not pending[1] or pending[1][2] ~= ARGV[2] then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
