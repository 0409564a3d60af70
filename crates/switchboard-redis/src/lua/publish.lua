-- KEYS: meta, log, channel, and (keyed publishes only) the idempotency key. ARGV: payload,
-- history size, history TTL ms, stream TTL ms, 8 random hex digits, and (keyed) the idempotency
-- window ms. Assigns the next offset, appends to history (stamped with Redis's clock, in ms),
-- publishes `1m<offset>:<epoch>:<payload>`. Returns `{offset, epoch}`; a keyed publish returns
-- `{offset, epoch, 0, false}` and its key remembers `offset:epoch` for the window. A key used
-- within the window publishes nothing and answers the first publish: `{offset, epoch, 1,
-- payload}` (payload: its stored data and sender, false when history no longer holds it; the
-- key does not keep a copy, so a flood of keyed publishes costs no more than history does).
-- An epoch is the generation that made it followed by the random digits: a stream made by
-- another generation of the server (before a restart or a failover, which may have lost its
-- last offsets) is started over with a new epoch, so an offset is never given to two messages
-- of one epoch.
-- Runs after generation.lua, which sets `gen`.
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    local offset, epoch = string.match(first, '^(%d+):(.*)$')
    local payload = false
    if redis.call('HGET', KEYS[1], 'e') == epoch then
      for _, entry in ipairs(redis.call('XRANGE', KEYS[2], offset .. '-0', offset .. '-0')) do
        local fields = entry[2]
        for i = 1, #fields, 2 do
          if fields[i] == 'p' then
            payload = fields[i + 1]
          end
        end
      end
    end
    return {tonumber(offset), epoch, 1, payload}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch or string.sub(epoch, 1, 8) ~= gen then
  epoch = gen .. ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  local time = redis.call('TIME')
  local now = time[1] .. string.format('%03d', math.floor(tonumber(time[2]) / 1000))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'p', ARGV[1], 't', now)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', KEYS[3], '1m' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
if KEYS[4] then
  redis.call('SET', KEYS[4], offset .. ':' .. epoch, 'PX', ARGV[6])
  return {offset, epoch, 0, false}
end
return {offset, epoch}
