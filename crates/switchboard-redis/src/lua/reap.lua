-- ARGV: key prefix, node (incarnation), mode, reaped mark TTL ms, batch, legacy batch. Removes
-- one batch of the node's sessions from the registry, members from presence (publishing a leave
-- for each) and fallback session links on this shard, popping them from the node's index sets
-- (`:sessions`, `:members`, `:links`); call it again while it answers 0. When the sets are empty
-- it forgets the node and answers 1. Modes: `forced`, a node leaving on purpose; `dead`, a node
-- whose liveness key expired: answers -1 and does nothing if the key exists (the node heartbeated
-- since the caller looked); `replaced`, an earlier incarnation of a node that started again under
-- the same id, reaped whatever its key says. Unless forced, the node is marked reaped, so that if
-- it was alive after all it announces its members again when it writes them back. Also drains the
-- `:rooms` and `:users` sets that nodes of earlier versions kept.
local prefix = ARGV[1]
local node = ARGV[2]
local mode = ARGV[3]
local base = prefix .. 'n:' .. node
if mode == 'dead' and redis.call('EXISTS', base) == 1 then
  return -1
end
if mode ~= 'forced' then
  redis.call('SET', base .. ':reaped', '1', 'PX', ARGV[4])
end
local batch = tonumber(ARGV[5])
local legacy = tonumber(ARGV[6])
local owner = node .. '\n'
local function leave(room, session, value)
  local user_end = string.find(value, '\n', #owner + 1, true)
  redis.call('HDEL', prefix .. 'r:' .. room .. ':presence', session)
  redis.call('PUBLISH', prefix .. 'r:' .. room, '1l' .. session .. '\n' .. string.sub(value, #owner + 1, user_end - 1))
end
for _, entry in ipairs(redis.call('SPOP', base .. ':members', batch)) do
  local cut = string.find(entry, '\n', 1, true)
  local session = string.sub(entry, 1, cut - 1)
  local room = string.sub(entry, cut + 1)
  local value = redis.call('HGET', prefix .. 'r:' .. room .. ':presence', session)
  if value and string.sub(value, 1, #owner) == owner then
    leave(room, session, value)
  end
end
for _, entry in ipairs(redis.call('SPOP', base .. ':sessions', batch)) do
  local cut = string.find(entry, '\n', 1, true)
  local session = string.sub(entry, 1, cut - 1)
  local key = prefix .. 'u:' .. string.sub(entry, cut + 1)
  if redis.call('HGET', key, session) == node then
    redis.call('HDEL', key, session)
  end
end
for _, session in ipairs(redis.call('SPOP', base .. ':links', batch)) do
  local key = prefix .. 'l:' .. session
  if redis.call('HGET', key, 'n') == node then
    redis.call('DEL', key)
  end
end
for _, room in ipairs(redis.call('SPOP', base .. ':rooms', legacy)) do
  local all = redis.call('HGETALL', prefix .. 'r:' .. room .. ':presence')
  for i = 1, #all, 2 do
    if string.sub(all[i + 1], 1, #owner) == owner then
      leave(room, all[i], all[i + 1])
    end
  end
end
for _, user in ipairs(redis.call('SPOP', base .. ':users', legacy)) do
  local key = prefix .. 'u:' .. user
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i + 1] == node then
      redis.call('HDEL', key, all[i])
    end
  end
end
for _, set in ipairs({':members', ':sessions', ':links', ':rooms', ':users'}) do
  if redis.call('EXISTS', base .. set) == 1 then
    return 0
  end
end
redis.call('DEL', base)
redis.call('SREM', prefix .. 'nodes', node)
if mode == 'forced' then
  redis.call('DEL', base .. ':reaped')
end
return 1
