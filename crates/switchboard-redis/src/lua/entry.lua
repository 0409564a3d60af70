-- Defines `entry_fields(fields)`, for the scripts that read history or inbox streams: the bytes of
-- an entry's payload (field `p`) and its stamp (field `t`, ms; 0 when absent).
local function entry_fields(fields)
  local size, stamp = 0, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then
      size = #fields[i + 1]
    elseif fields[i] == 't' then
      stamp = tonumber(fields[i + 1]) or 0
    end
  end
  return size, stamp
end
