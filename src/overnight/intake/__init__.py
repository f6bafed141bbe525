"""Queue intake: `overnight consume JOB` collects JSON records from RabbitMQ, Redis Streams or
Amazon SQS into the job's ledger and processes them in batches (consumer.py); results go to a
results queue or any of the job's outputs (kinds.py). One module per broker: rabbitmq.py,
redis_streams.py, sqs.py. The brokers' clients are the `queue` extra."""

from .consumer import Consumer, ConsumeReport

__all__ = ["ConsumeReport", "Consumer"]
