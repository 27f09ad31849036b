-- A reaper claims a dead instance: only when its heartbeat is gone, and
-- only one reaper at a time. Atomic with beat.lua (same slot).
--
-- KEYS[1] {prefix}:instance:{I}   KEYS[2] {prefix}:reaping:{I}
-- ARGV[1] the reaper's instance id   ARGV[2] the claim's lifetime, ms
--
-- Returns 1 when claimed, 0 when the instance lives or another reaper
-- holds the claim.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
