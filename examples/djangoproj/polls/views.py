from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from .models import Question, Vote
from .tasks import tally_votes


class Vetoed(Exception):
    pass


@require_POST
def vote(request: HttpRequest, question_id: int) -> JsonResponse:
    try:
        with transaction.atomic():
            question = Question.objects.get(pk=question_id)
            Vote.objects.create(question=question)
            # Sent once the transaction commits, so the worker sees the new vote;
            # never sent if it rolls back.
            tally_votes.delay_on_commit(question.id)
            if request.POST.get("veto"):
                raise Vetoed  # rolls the vote back, and the task with it
    except Vetoed:
        return JsonResponse({"voted": False}, status=409)
    return JsonResponse({"voted": True}, status=202)


@require_POST
def recount(request: HttpRequest, question_id: int) -> JsonResponse:
    result = tally_votes.delay(question_id)
    return JsonResponse({"task_id": result.id}, status=202)
