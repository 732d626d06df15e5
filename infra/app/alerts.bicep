// Log alerts on the stable key=value fields the collector writes into its log lines (Application Insights traces):
//   outcome=needs_reconsent          a mailbox whose grant was revoked or expired; someone must sign it in again
//                                    (the collect line of the failing run, then a daily line until it is fixed)
//   consecutive_failures=<n>         how many collector runs in a row have failed for a mailbox
//   credential_expires_in_days=<n>   days left on the Entra client secret (secret mode: the expiry date of its
//                                    Key Vault secret, read once a day; negative once it has expired)
//   collect run completed            one line per timer run: its absence means the timer, the app or the deployment
//                                    is broken (the heartbeat)
//   hours_since_success=<n>          an active mailbox not collected successfully for an hour or more, every run
// Each alert is split by mailbox where the line names one, so one broken mailbox raises one alert.
param namePrefix string
param actionGroupName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the Application Insights component that receives the app\'s logs.')
param appInsightsId string

@description('Email address for the action group; empty: no receiver (attach one later in the portal).')
param alertEmail string = ''

@minValue(1)
param consecutiveFailureThreshold int = 3

@minValue(1)
param credentialExpiryWarningDays int = 30

@description('Minutes without a completed collection run before the heartbeat alert fires: three periods of the collector\'s schedule (every 5 minutes by default).')
@minValue(5)
@maxValue(1440)
param heartbeatWindowMinutes int = 15

@description('Hours an active mailbox may go without a successful collection before its alert fires.')
@minValue(1)
@maxValue(48)
param notCollectedHours int = 6

var emailReceivers = [
  {
    name: 'operator-email'
    emailAddress: alertEmail
    useCommonAlertSchema: true
  }
]

var mailboxDimension = [
  {
    name: 'mailbox'
    operator: 'Include'
    values: [
      '*'
    ]
  }
]

var reconsentQuery = '''
traces
| where message has "reconsent"
| extend outcome = tostring(extract(@"^(?:collect|mailbox still needs re-consent) mailbox=\S+ outcome=(\S+)", 1, message))
| where outcome == "needs_reconsent"
| extend mailbox = tostring(extract(@"^(?:collect|mailbox still needs re-consent) mailbox=(\S+)", 1, message))
| project timestamp, mailbox
'''

var heartbeatQuery = '''
traces
| where message has "completed"
| extend run_mode = tostring(extract(@"^collect run completed mode=(\w+)", 1, message))
| where isnotempty(run_mode)
| project timestamp, run_mode
'''

var notCollectedQuery = '''
traces
| where message has "collected"
| extend hours_since_success = toint(extract(@"^mailbox not collected mailbox=\S+ hours_since_success=(\d+)", 1, message))
| where isnotnull(hours_since_success)
| extend mailbox = tostring(extract(@"^mailbox not collected mailbox=(\S+)", 1, message))
| project timestamp, mailbox, hours_since_success
'''

var failuresQuery = '''
traces
| where message has "collect"
| extend consecutive_failures = toint(extract(@"^collect mailbox=\S+ outcome=\S+ messages=\d+ bytes=\d+ duration_ms=\d+ more=\w+ consecutive_failures=(\d+)", 1, message))
| where isnotnull(consecutive_failures)
| extend mailbox = tostring(extract(@"^collect mailbox=(\S+)", 1, message))
| project timestamp, mailbox, consecutive_failures
'''

var credentialQuery = '''
traces
| where message has "credential"
| extend credential_expires_in_days = toint(extract(@" credential_expires_in_days=(-?\d+)", 1, message))
| where isnotnull(credential_expires_in_days)
| project timestamp, credential_expires_in_days
'''

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: actionGroupName
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'mailcollect'
    enabled: true
    emailReceivers: empty(alertEmail) ? [] : emailReceivers
  }
}

resource needsReconsent 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-needs-reconsent'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Mailbox needs re-consent'
    description: 'A mailbox lost its grant (password reset, revoked session, 90 days idle); reported daily until fixed. GET /api/mailboxes/{address} (reconsent_link) or the status page /api/status gives a re-consent link to send to the mailbox owner; an admin can also open /api/mailboxes/{address}/authorize.'
    severity: 1
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: reconsentQuery
          timeAggregation: 'Count'
          dimensions: mailboxDimension
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource collectionFailing 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-collection-failing'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Mail collection failing'
    description: 'A mailbox has failed ${consecutiveFailureThreshold} or more collector runs in a row; the log line names the error class.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    criteria: {
      allOf: [
        {
          query: failuresQuery
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'consecutive_failures'
          dimensions: mailboxDimension
          operator: 'GreaterThanOrEqual'
          threshold: consecutiveFailureThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource credentialExpiring 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-credential-expiring'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Entra client credential near expiry'
    description: 'The Entra client secret expires within ${credentialExpiryWarningDays} days; an expired one stops every mailbox (AADSTS7000222). Create a new one and store it in Key Vault with its expiry date, or move to the federated credential.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'P1D'
    criteria: {
      allOf: [
        {
          query: credentialQuery
          timeAggregation: 'Minimum'
          metricMeasureColumn: 'credential_expires_in_days'
          operator: 'LessThanOrEqual'
          threshold: credentialExpiryWarningDays
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource heartbeat 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-heartbeat'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Mail collection stopped'
    description: 'No collection run completed for ${heartbeatWindowMinutes} minutes: the timer stopped, the app is down or a deployment broke it. Check the function app (Overview, Log stream) and its last deployment.'
    severity: 1
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT${heartbeatWindowMinutes}M'
    criteria: {
      allOf: [
        {
          query: heartbeatQuery
          timeAggregation: 'Count'
          operator: 'LessThan'
          threshold: 1
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

resource notCollected 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: '${namePrefix}-not-collected'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Mailbox not collected'
    description: 'An active mailbox has not been collected successfully for ${notCollectedHours} hours or more; the line names its last error class. The status page (/api/status) shows the error with its remedy and can diagnose the mailbox.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: notCollectedQuery
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'hours_since_success'
          dimensions: mailboxDimension
          operator: 'GreaterThanOrEqual'
          threshold: notCollectedHours
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
