-- KEYS: the user's inbox meta, inbox log. ARGV: seq, inbox TTL ms, 8 random hex digits.
-- Acknowledges up to the seq: acked becomes max(acked, seq), the entries up to it leave the log,
-- and both keys live for the TTL from now. A seq beyond the inbox's records nothing. Returns
-- `{seq, acked, epoch, done}` (done: 1, or 0 for beyond). An inbox without state (or made by
-- another generation of the server, then forgotten) is at seq 0 in an epoch of the current
-- generation that is not stored; only seq 0 is done there.
-- Runs after generation.lua, which sets `gen`.
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and string.sub(epoch, 1, 8) ~= gen then
  redis.call('DEL', KEYS[1], KEYS[2])
  epoch = false
end
local want = tonumber(ARGV[1])
if not epoch then
  local done = 0
  if want == 0 then
    done = 1
  end
  return {0, 0, gen .. ARGV[3], done}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 's'))
local acked = tonumber(redis.call('HGET', KEYS[1], 'a'))
if want > seq then
  return {seq, acked, epoch, 0}
end
if want > acked then
  acked = want
  redis.call('HSET', KEYS[1], 'a', acked)
  redis.call('XTRIM', KEYS[2], 'MINID', (acked + 1) .. '-0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {seq, acked, epoch, 1}
