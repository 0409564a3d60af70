-- KEYS: presence, channel. ARGV: node liveness key prefix, reaped mark TTL ms. Returns the
-- stored members of live nodes; members of dead nodes are removed, a leave is published for
-- each, and the dead node is marked reaped (`<prefix><node>:reaped`), so that if it was only
-- paused it announces its members again when it writes them back.
local all = redis.call('HGETALL', KEYS[1])
local members = {}
local alive = {}
for i = 1, #all, 2 do
  local value = all[i + 1]
  local first = string.find(value, '\n', 1, true)
  local node = string.sub(value, 1, first - 1)
  if alive[node] == nil then
    alive[node] = redis.call('EXISTS', ARGV[1] .. node) == 1
    if not alive[node] then
      redis.call('SET', ARGV[1] .. node .. ':reaped', '1', 'PX', ARGV[2])
    end
  end
  if alive[node] then
    members[#members + 1] = value
  else
    local second = string.find(value, '\n', first + 1, true)
    local user = string.sub(value, first + 1, second - 1)
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('PUBLISH', KEYS[2], '1l' .. all[i] .. '\n' .. user)
  end
end
return members
