"""A stand-in for jetson-stats' `jtop` (the part of its 4.2 API the node uses), so that the node's
Jetson power path runs here: tests put this folder first on PYTHONPATH.

The board draws ROBUSTDICE_TEST_POWER_MW (default 5000) on its one rail, VDD_IN, as the INA3221
reports it on a Jetson Nano; `stats` reports the GPU 40 % busy.
"""
import os


class JtopException(Exception):
    pass


class jtop:  # noqa: N801 - jetson-stats' own name
    def __init__(self, interval=1.0):
        self.interval = interval
        self._started = False

    def start(self):
        self._started = True

    def close(self):
        self._started = False

    def ok(self):
        return self._started

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def power(self):
        if not self._started:
            raise JtopException("jtop is not started")
        mw = float(os.environ.get("ROBUSTDICE_TEST_POWER_MW", "5000"))
        rail = {"online": True, "type": "INA3221", "status": "ok", "volt": 5000, "curr": mw / 5.0,
                "warn": 32760, "crit": 32760, "power": mw, "avg": mw}
        return {"rail": {"VDD_IN": rail}, "tot": {"volt": 5000, "curr": mw / 5.0, "power": mw, "avg": mw,
                                                  "name": "VDD_IN"}}

    @property
    def stats(self):
        return {"GPU": 40.0}
