"""Two small models: accounts for transactions and row locks, readings for a long iterator."""

from django.db import models


class Account(models.Model):
    name = models.CharField(max_length=50, unique=True)
    balance = models.IntegerField(default=0)


class Reading(models.Model):
    n = models.IntegerField()
    label = models.CharField(max_length=20)
