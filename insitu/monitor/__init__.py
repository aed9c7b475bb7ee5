"""``insitu monitor``: a run's live page, served by modules in supervised subprocesses.

See docs/monitoring.md. :mod:`insitu.monitor.server` is the aiohttp server,
:mod:`insitu.monitor.supervisor` supervises the modules, :mod:`insitu.monitor.child` is a
module's side, :mod:`insitu.monitor.status_module` and :mod:`insitu.monitor.snapshot_module`
are the monitor's own modules. Needs the ``insitu[monitor]`` extra (aiohttp, matplotlib).
"""
