// Log alerts on the stable key=value fields the collector writes into its log lines (Application Insights traces):
//   collect mailbox=<address> outcome=needs_reconsent ...   a mailbox whose grant was revoked or expired
//   collect mailbox=<address> ... consecutive_failures=<n>    how many collector runs in a row have failed
//   credential_expires_in_days=<n>   days left on the Entra client secret (secret mode: the expiry date of its
//                                    Key Vault secret, read once a day; negative once it has expired)
// Each alert is split by mailbox where the line names one, so one broken mailbox raises one alert.
// Kusto's `has` matches whole terms (runs of letters and digits: `needs_reconsent` is two terms), so `has` only
// narrows by one plain word and `extract` reads each field; tests/unit/test_alert_queries.py runs these queries
// over the log of a real run.
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
| where message has "collect"
| extend outcome = tostring(extract(@"^collect mailbox=\S+ outcome=(\S+)", 1, message))
| where outcome == "needs_reconsent"
| extend mailbox = tostring(extract(@"^collect mailbox=(\S+)", 1, message))
| project timestamp, mailbox
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
    description: 'A mailbox lost its grant (password reset, revoked session, 90 days idle). Open /api/mailboxes/{address}/authorize and sign the mailbox in again.'
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

output actionGroupId string = actionGroup.id
