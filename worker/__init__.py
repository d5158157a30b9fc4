"""The clusteralert worker: consumes events from RabbitMQ, decides from the catalog which
are mailed, renders them and sends them over TLS. Stages, one module each: decode
(:mod:`shared.event`) > filter (:mod:`shared.filter`) > render (:mod:`worker.render`) >
send (:mod:`worker.send`), chained by :mod:`worker.pipeline`; the outcome is settled by
:mod:`worker.settle` on the thread of :mod:`worker.consume`, through :mod:`worker.broker`.
See docs/design.md."""
