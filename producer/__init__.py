"""The clusteralert producer: turns cluster events into durable spool files on the node,
and forwards the spool to RabbitMQ with publisher confirms."""
