from django.db import models


class Question(models.Model):
    text = models.CharField(max_length=200)


class Vote(models.Model):
    question = models.ForeignKey(Question, on_delete=models.CASCADE, related_name="votes")


class Tally(models.Model):
    """What the task saw: one row each time it counted."""

    question = models.ForeignKey(Question, on_delete=models.CASCADE, related_name="tallies")
    votes = models.IntegerField()
