"""SIGTERM drains: requests in flight when it comes are answered, then the proxy exits 0.

A real proxy on SoftHSM behind the fault-injection module, which makes every encryption take
60 ms (under the 100 ms call limit), so that requests are surely in flight when the signal
arrives.  Its own module-scoped rig: this test stops the proxy.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from tests.support.api import b64
from tests.support.faultrig import FaultRig
from tests.support.waiting import wait_for
from tests.support.xks_client import Response


def test_sigterm_answers_requests_in_flight_then_exits(fault_rig: FaultRig) -> None:
    rig = fault_rig
    wait_for(lambda: rig.client.encrypt("foo", plaintext=b64(b"x")).status == 200, "serving")
    rig.control.slow(30, ["C_Encrypt"])  # called twice per encryption: 60 ms
    answers: list[Response | BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            got: Response | BaseException = rig.client.encrypt("foo", plaintext=b64(b"drain"))
        except BaseException as exc:  # a reset connection would be a lost request
            got = exc
        with lock:
            answers.append(got)

    # Two rounds on the rig's 2 sessions (120 ms): all within the 200 ms request deadline.
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.03)  # every request sent; the first ones are inside the HSM
    rig.server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=10)
    assert rig.server.proc.wait(timeout=30) == 0
    rig.control.ok()
    assert len(answers) == 4
    statuses = [a.status if isinstance(a, Response) else repr(a) for a in answers]
    assert statuses == [200] * 4, statuses  # none dropped, none cut short
    log = rig.server.log_text()
    assert log.index('"stopping"') < log.rindex('"xks_request"')  # answered after the signal
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rig.server.port), timeout=2).close()
