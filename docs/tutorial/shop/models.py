"""The shop's tables: orders, and what the projector derives from their events."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    customer: Mapped[str] = mapped_column(String(64))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class CustomerTotal(Base):
    __tablename__ = "customer_totals"

    customer: Mapped[str] = mapped_column(String(64), primary_key=True)
    orders: Mapped[int]
    total: Mapped[Decimal] = mapped_column(Numeric(14, 2))
