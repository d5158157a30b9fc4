"""The clusteralert worker: consumes events from RabbitMQ, decides from the catalog which
are mailed, renders them and sends them over TLS. Stages, one module each:
decode (:mod:`shared.event`) > filter (:mod:`shared.filter`) > render (:mod:`worker.render`)
> send (:mod:`worker.send`) > settle (:mod:`worker.consume`)."""
