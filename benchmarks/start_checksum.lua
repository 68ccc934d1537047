-- wrk script: POST startTask(checksum) of a fresh image file per call.
-- Script arguments (after "--"): the images directory, and the number of the
-- first file to use (files are DIR/f-N.img; each task locks its file, so no
-- file is used twice against one agent). Any answer holding an error is
-- printed, and the benchmark fails on it.
local counter = 0
local directory = ""

init = function(args)
  directory = args[1]
  counter = tonumber(args[2] or "0")
end

request = function()
  local body = '{"jsonrpc":"2.0","method":"startTask","id":1,"params":{"kind":"checksum",' ..
    '"params":{"path":"' .. directory .. '/f-' .. counter .. '.img"}}}'
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

response = function(status, headers, body)
  if status ~= 200 or string.find(body, '"error"', 1, true) then
    io.write("ERROR " .. status .. " " .. body .. "\n")
  end
end
