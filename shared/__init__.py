"""Code shared by the clusteralert producer and worker: the event and its codec, config,
catalog, filter decision, AMQP topology as data, and error classes.

Nothing here imports a broker or SMTP client, so the producer's per-event command stays
light; import the submodules directly.
"""
