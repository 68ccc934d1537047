async def test_ping(rpc):
    result = await rpc.call("ping")
    assert result["version"]


def test_ping_real_process(agent_process):
    assert agent_process.call("ping")["uptime"] >= 0
    assert agent_process.call("ping", unix=True)["version"]
