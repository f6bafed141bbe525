"""The peer for the overhead benchmark: a bare AsyncOpenAI loop (semaphore + gather), no
ledger, no limiter, no cache. Run as its own process, like `overnight run`.

python raw_openai_loop.py URL N CONCURRENCY  -> prints seconds
"""

from __future__ import annotations

import asyncio
import sys
import time

import openai


async def main(url: str, n: int, concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url=url, api_key="sk-bench", max_retries=2)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"ticket {i}: the invoice total"}],
                max_tokens=16,
                temperature=0,
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.perf_counter() - t0
    await client.close()
    return seconds


if __name__ == "__main__":
    url, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(asyncio.run(main(url, n, c)))
