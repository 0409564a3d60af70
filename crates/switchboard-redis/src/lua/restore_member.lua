-- KEYS: presence, channel, the node's member set, the node's reaped mark. ARGV: session, stored
-- member, join event, the member's entry in the node's member set. Writes one of this node's
-- members back (after Redis lost it, or after the node was reaped while alive). Publishes the join only when the member was missing
-- and the node had been reaped, i.e. when its leave had been published.
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
if added == 1 and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 1
end
return 0
