-- wrk script: POST one JSON-RPC ping (the body every HTTP benchmark sends).
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","method":"ping","id":1}'
wrk.headers["Content-Type"] = "application/json"
