"""One Transport (DHT node + p2pd, no training) inside a lab namespace, for tests/test_nat.py.

    python tests/nat_peer.py DIR NAME --listen IPV4 --reachability MODE [--peers MADDR...] [--serve-bytes N] [--fetch-from OTHER]

Writes DIR/NAME.json once started: its libp2p id, announced addresses, `reachability()` and the
id of the random blob it serves (`--serve-bytes`). With `--fetch-from OTHER` it then waits for
DIR/OTHER.json, dials OTHER's announced addresses (`Transport.connect`), fetches its blob and
adds the outcome under "fetch" (a failed dial or fetch is tried again for a minute, each
attempt bounded). It leaves when DIR/stop appears (or after 120 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from p2pmodel.daemon.reachability import own_addresses, plan_relays
from p2pmodel.daemon.transport import FetchError, Transport, TransportError


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def _wait_file(path: Path, deadline: float) -> dict:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.2)
    return json.loads(path.read_text())


async def main(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + 120
    host = (f"/ip4/{args.listen}/tcp/0",)  # the lab namespace's own address, never the host's network
    plan = plan_relays(args.reachability, own_addresses(host, ()), args.peers)
    transport = await Transport.create(initial_peers=args.peers, host_maddrs=host, relay_plan=plan)
    try:
        me: dict = {"libp2p_id": transport.peer_id.to_base58(), "addrs": await transport.visible_maddrs()}
        if args.serve_bytes:
            me["serves"] = transport.put_blob(os.urandom(args.serve_bytes))
        me["reachability"] = transport.reachability()
        _write(args.dir / f"{args.name}.json", me)
        if args.fetch_from:
            other = await _wait_file(args.dir / f"{args.fetch_from}.json", deadline)
            t0, failed = time.monotonic(), []
            while "fetch" not in me:  # a dial that hangs now and then is tried again, not waited out
                try:
                    await asyncio.wait_for(transport.connect(other["libp2p_id"], other["addrs"]), 20)
                    data = await transport.call_fetch(other["libp2p_id"], other["serves"], max_size=64 << 20, timeout=30)
                    me["fetch"] = {"bytes": len(data), "seconds": round(time.monotonic() - t0, 2), "failed_attempts": failed}
                except (TransportError, FetchError, asyncio.TimeoutError) as e:
                    failed.append(f"{type(e).__name__}: {e}"[:300])
                    if time.monotonic() > deadline - 60:  # report before the test's own wait runs out
                        me["fetch"] = {"error": failed[-1], "failed_attempts": failed}
                    else:
                        await asyncio.sleep(1.0)
            await transport._refresh_reachability()  # the connection just made, counted now
            me["reachability"] = transport.reachability()
            _write(args.dir / f"{args.name}.json", me)
        while not (args.dir / "stop").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await transport.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--listen", required=True, help="IPv4 address of this lab host (NatLab.address)")
    parser.add_argument("--reachability", default="auto")
    parser.add_argument("--peers", nargs="*", default=[])
    parser.add_argument("--serve-bytes", type=int, default=0)
    parser.add_argument("--fetch-from", default="")
    asyncio.run(main(parser.parse_args()))
