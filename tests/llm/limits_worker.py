"""One of the processes of the cross-process rate-limit test (run by tests/llm/test_limits.py).

    python -m tests.llm.limits_worker URL KEY_PREFIX NAME RPM ATTEMPTS

It opens a :class:`RedisLimiter`, says it is ready (``RPUSH KEY_PREFIXready``), waits
for the go (``BLPOP KEY_PREFIXgo``), fires ``ATTEMPTS`` concurrent acquires at the
limit ``NAME`` and prints ``{"admitted": .., "refused": .., "errors": ..}`` as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys

import redis.asyncio

from interlock.errors import RateLimitedError
from interlock.llm.limits import Limit, RedisLimiter


async def main(url: str, prefix: str, name: str, rpm: int, attempts: int) -> dict[str, int]:
    limit = Limit(name, rpm=rpm)
    async with (
        redis.asyncio.Redis.from_url(url, socket_timeout=90) as control,  # BLPOP waits 60 s
        RedisLimiter(url, key_prefix=prefix, timeout_s=30.0) as limiter,
    ):

        async def one() -> bool:
            try:
                await limiter.acquire([limit], 1)
            except RateLimitedError:
                return False
            return True

        await control.rpush(f"{prefix}ready", 1)
        if await control.blpop([f"{prefix}go"], timeout=60) is None:
            raise SystemExit("no go signal within 60 s")
        results = await asyncio.gather(*(one() for _ in range(attempts)))
        return {
            "admitted": sum(results),
            "refused": len(results) - sum(results),
            "errors": limiter.stats.errors,
        }


if __name__ == "__main__":
    url, prefix, name, rpm, attempts = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(url, prefix, name, int(rpm), int(attempts)))))
