"""ICE on a loopback-only host.

aioice gathers host candidates from every interface except 127.0.0.1. On a machine whose only
interface is loopback (CI, sandboxes), or when the page and the server share one machine and should
not leave it, that leaves no candidate and ICE fails. `restrict_to_loopback()` makes aioice offer
127.0.0.1 only (Chromium then needs `--allow-loopback-in-peer-connection`). It patches the module
function aioice calls, process-wide; serve on a real interface and this is not needed.
"""

from __future__ import annotations

import aioice.ice


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def restrict_to_loopback() -> None:
    aioice.ice.get_host_addresses = _loopback_addresses
