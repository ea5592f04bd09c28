"""Development and test-rig code: never imported by a serving proxy.

- :mod:`xksproxy.dev.setup`: ``xksproxy dev-setup``, a SoftHSM rig made from nothing.
- :mod:`xksproxy.dev.faultinject`: the fault-injection and vendor-emulation PKCS#11 module (C
  source, built on demand) and the Python helpers that drive its control files.
"""
