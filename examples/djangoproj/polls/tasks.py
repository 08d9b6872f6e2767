"""The app's tasks: @shared_task, since a reusable app does not import the project."""

from qops import shared_task

from .models import Question, Tally


@shared_task
def tally_votes(question_id: int) -> int:
    """Count the question's votes and keep the count (runs on a qops worker)."""
    question = Question.objects.get(pk=question_id)
    votes = question.votes.count()
    Tally.objects.create(question=question, votes=votes)
    return votes
