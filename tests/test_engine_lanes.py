"""Which engine of its mask a request runs on (serve/llamacpp.py Lanes): alone on the machine, the mask's solo
engine with every core; beside other masks' requests, the shared engines, all at once; never more threads
computing than cores, no request overtaking one that waits, a cancelled wait freeing its place."""

import asyncio

from igprune.serve.llamacpp import EngineOptions, EnginePool, Lanes


async def _enter(lanes: Lanes, mask: int, log: list) -> None:
    log.append((mask, await lanes.enter(mask)))


def test_alone_a_mask_runs_solo_and_beside_others_every_mask_runs_shared():
    async def scenario() -> None:
        lanes, log = Lanes(), []
        await _enter(lanes, 0, log)
        await _enter(lanes, 0, log)  # joins its mask's solo engine
        assert log == [(0, True), (0, True)] and lanes.solo == 0
        waiting = [asyncio.create_task(_enter(lanes, m, log)) for m in (1, 0)]
        await asyncio.sleep(0)
        assert len(log) == 2  # 1 waits for the solo engine; 0's next waits behind it (no overtaking)
        lanes.leave()
        await asyncio.sleep(0)
        assert len(log) == 2  # the solo engine has a request left
        lanes.leave()
        await asyncio.gather(*waiting)
        assert log[2:] == [(1, False), (0, False)] and lanes.solo is None and lanes.running == 2
        await _enter(lanes, 2, log)  # while the masks run shared, arrivals run shared at once
        assert log[-1] == (2, False) and lanes.running == 3
        for _ in range(3):
            lanes.leave()
        assert (lanes.solo, lanes.running, lanes.waiting) == (None, 0, [])
        await _enter(lanes, 1, log)  # idle again: solo
        assert log[-1] == (1, True)

    asyncio.run(scenario())


def test_waiting_requests_of_one_mask_take_the_machine_solo_together():
    async def scenario() -> None:
        lanes, log = Lanes(), []
        await _enter(lanes, 0, log)
        waiting = [asyncio.create_task(_enter(lanes, 1, log)) for _ in range(3)]
        await asyncio.sleep(0)
        lanes.leave()
        await asyncio.gather(*waiting)
        assert log[1:] == [(1, True)] * 3 and lanes.solo == 1 and lanes.running == 3

    asyncio.run(scenario())


def test_a_cancelled_wait_frees_its_place():
    async def scenario() -> None:
        lanes, log = Lanes(), []
        await _enter(lanes, 0, log)
        gone = asyncio.create_task(_enter(lanes, 1, log))
        stays = asyncio.create_task(_enter(lanes, 2, log))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert [mask for mask, _ in lanes.waiting] == [2]
        lanes.leave()
        await stays
        assert log == [(0, True), (2, True)] and lanes.running == 1

    asyncio.run(scenario())


def test_each_mask_has_a_shared_engine_and_a_solo_one_with_every_core(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    paths, binary = [tmp_path / "a.gguf", tmp_path / "b.gguf"], tmp_path / "llama-server"
    both = EnginePool(paths, [0, 1, 0], binary=binary)
    shared = EnginePool(paths, [0, 1, 0], EngineOptions(solo=False), binary=binary)
    alone = EnginePool(paths[:1], [0, 0], binary=binary)
    assert [(e.index, e.lane, e.options.threads) for e in both.all] == \
        [(0, "shared", 2), (1, "shared", 2), (0, "solo", 4), (1, "solo", 4)]
    assert both.lanes is not None and both.solo[1].gguf == both.engines[1].gguf
    assert [(e.lane, e.options.threads) for e in shared.all] == [("shared", 2)] * 2 and shared.lanes is None
    assert [(e.lane, e.options.threads) for e in alone.all] == [("shared", 4)] and alone.lanes is None
    for pool in (both, shared, alone):
        pool.stop()
