-- An instance's heartbeat. Atomic on the instance's slot, so it and a
-- reaper's claim (reap_claim.lua) are ordered: either the beat lands first
-- and no reaper claims the instance, or the reaper claimed it first and
-- the beat sees the claim.
--
-- KEYS[1] {prefix}:instance:{I}   KEYS[2] {prefix}:reaping:{I}
-- ARGV[1] the heartbeat (JSON)    ARGV[2] its expiry, milliseconds
--
-- Returns {had, reaping}: had = 1 when the heartbeat was there before
-- (0: it had expired or was lost), reaping = 1 while a reaper is dropping
-- this instance's connections.
local had = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
local reaping = redis.call('EXISTS', KEYS[2])
if had then
  return {1, reaping}
end
return {0, reaping}
