-- KEYS: the user's session hash. ARGV: envelope, node liveness prefix, inbox prefix. Publishes
-- the envelope once to the inbox of every live node hosting the user; drops sessions of dead
-- nodes. Returns how many live sessions the user has.
-- Runs after deliver.lua, which defines `deliver`.
return deliver(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
