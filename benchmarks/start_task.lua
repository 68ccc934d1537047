-- wrk script: POST startTask(test.sleep) with a fresh taskID per call.
-- Script argument (after "--"): calls per request; 1 sends one call, N > 1 a
-- JSON-RPC batch of N calls. Any answer holding an error is printed, and the
-- benchmark fails on it.
local counter = 0
local size = 1
local prefix = ""

init = function(args)
  size = tonumber(args[1] or "1")
  math.randomseed(os.time())
  prefix = string.format("%08x", math.random(0, 0x7fffffff))
end

local function call(index)
  counter = counter + 1
  local id = string.format("%s-0000-4000-8000-%012x", prefix, counter)
  return '{"jsonrpc":"2.0","method":"startTask","id":' .. index ..
    ',"params":{"kind":"test.sleep","params":{"seconds":1},"taskID":"' .. id .. '"}}'
end

request = function()
  if size == 1 then
    return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, call(1))
  end
  local calls = {}
  for index = 1, size do
    calls[index] = call(index)
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    "[" .. table.concat(calls, ",") .. "]")
end

response = function(status, headers, body)
  if status ~= 200 or string.find(body, '"error"', 1, true) then
    io.write("ERROR " .. status .. " " .. body .. "\n")
  end
end
